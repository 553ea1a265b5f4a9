//! Checkpoints: the background task that moves the write buffer's frozen generations into
//! segments and publishes each as a new manifest version; writers wait for room here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::fs::File;
use strata_bdev::{Error, ErrorKind, Result};

use super::sink::SegmentSink;
use super::Inner;
use crate::failpoint::failpoint;
use crate::fileio;
use crate::format::Manifest;
use crate::layout::{manifest_key, now_secs, obj_err};
use crate::objects::{retry, ObjError};
use crate::wal::Loc;

/// Bytes of the write buffer a checkpoint reads at once.
const WAL_READ: usize = 1 << 20;

/// What a checkpoint must make of the write buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Every page buffered so far goes to the object store (an explicit checkpoint, a
    /// snapshot, a resize).
    Complete,
    /// A background checkpoint: pages rewritten since in later generations (as safely) stay
    /// only there, and a generation with none left is dropped without a manifest.
    Background,
}

/// The background task: checkpoints by size and age, compaction, retries.
pub(super) async fn checkpointer(inner: Arc<Inner>) {
    loop {
        if inner.life.closed.load(Ordering::Acquire) {
            return;
        }
        inner.maybe_compact_in_background();
        if inner.fenced().is_none() && inner.wal.is_some() {
            if let Err(e) = inner.checkpoint_due().await {
                tracing::warn!(image = %inner.name, error = %e.chain(), "checkpoint");
            }
        }
        let tick = Duration::from_secs(1).min(inner.store.settings.checkpoint_age);
        let _ = tokio::time::timeout(tick, inner.life.kick.notified()).await;
    }
}

impl Inner {
    /// Move everything buffered so far into segments and a new manifest.
    pub(super) async fn checkpoint(&self, mode: Mode) -> Result<()> {
        let _turn = self.work.checkpointing.lock().await;
        let wal = self.wal()?;
        wal.rotate()?;
        *self.work.last_checkpoint.lock().expect("lock") = Instant::now();
        for g in wal.frozen_ids() {
            self.check_open("checkpoint")?;
            self.checkpoint_generation(g, mode).await?;
            self.life.progress.notify_waiters();
        }
        Ok(())
    }

    /// The background checkpoint: freeze the active generation once it is full or its
    /// writes are `checkpoint_age` old, then upload frozen generations, oldest first, while
    /// the buffer holds more than half of `max_buffered_bytes` or they are older than
    /// `checkpoint_age`. Until then a generation stays in the buffer, where later rewrites of
    /// its pages make their upload unnecessary.
    async fn checkpoint_due(&self) -> Result<()> {
        let _turn = self.work.checkpointing.lock().await;
        let wal = self.wal()?;
        let settings = &self.store.settings;
        let aged =
            self.work.last_checkpoint.lock().expect("lock").elapsed() >= settings.checkpoint_age;
        let rotated = if aged {
            wal.rotate()?
        } else {
            wal.rotate_at(settings.checkpoint_bytes)?
        };
        if aged || rotated.is_some() {
            *self.work.last_checkpoint.lock().expect("lock") = Instant::now();
        }
        for g in wal.frozen_ids() {
            self.check_open("checkpoint")?;
            let (_, total) = wal.sizes();
            let old = wal.age(g).is_some_and(|a| a >= settings.checkpoint_age);
            if !old && total <= settings.max_buffered_bytes / 2 {
                break;
            }
            self.checkpoint_generation(g, Mode::Background).await?;
            self.life.progress.notify_waiters();
        }
        Ok(())
    }

    /// Publish `next` as the new manifest version: create-only, so a second writer that took
    /// this version fences us.
    pub(super) async fn publish(&self, next: &Manifest) -> Result<()> {
        let objects = &*self.store.objects;
        let key = manifest_key(&self.name, next.version);
        let bytes = Bytes::from(next.encode());
        let r = retry(
            objects,
            "publish manifest",
            u32::MAX,
            || self.life.closed.load(Ordering::Acquire),
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
                *self.life.fenced.lock().expect("lock") = Some(why.clone());
                self.life.progress.notify_waiters();
                Err(Error::new(ErrorKind::Io, why))
            }
            Err(e) => Err(obj_err(&format!("checkpoint image {}", self.name), e)),
        }
    }

    /// The manifest that follows the current one, changed by `edit`.
    pub(super) fn next_manifest(&self, edit: impl FnOnce(&mut Manifest)) -> Manifest {
        let mut m = self.base.read().expect("lock").manifest.clone();
        m.version += 1;
        m.writer = self.writer.clone();
        m.created = now_secs();
        edit(&mut m);
        m
    }

    /// Checkpoint frozen generation `g`: its pages into segments, then a manifest naming them
    /// and `g` as the newest generation they contain; then `g` is deleted.
    pub(super) async fn checkpoint_generation(&self, g: u64, mode: Mode) -> Result<()> {
        let wal = self.wal()?;
        let frozen = match mode {
            Mode::Complete => wal.frozen(g),
            Mode::Background => {
                // Commit what later generations hold, so that replay keeps it: a page they
                // rewrote need not be uploaded from this one.
                wal.commit()?;
                wal.frozen_live(g)
            }
        };
        let Some((file, pages)) = frozen else {
            return Ok(());
        };
        if pages.is_empty() && mode == Mode::Background {
            // Every page has a newer version that replay keeps whenever it would keep this
            // one: nothing to upload or publish.
            wal.retire(g)?;
            self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(image = %self.name, generation = g, "checkpoint done: all rewritten since");
            return Ok(());
        }
        let mut sink = SegmentSink::new(self, format!("segments/{g:016x}-{}", self.writer));
        if pages.len() as u64 * self.page_size as u64 > self.store.settings.segment_bytes {
            sink = sink.leased();
        }
        self.copy_generation(&file, &pages, &mut sink).await?;
        let made = sink.finish().await?;
        failpoint("checkpoint-after-segments");
        let publishing = self.work.publishing.lock().await;
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
                let id = base.add_segment(self.seg_info(&r), entries);
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

    /// Feed a generation's pages (`pages`, in page order, from `file`) to `sink`, reading
    /// consecutive places of the file together.
    async fn copy_generation(
        &self,
        file: &Arc<File>,
        pages: &[(u64, Loc)],
        sink: &mut SegmentSink<'_>,
    ) -> Result<()> {
        let ps = self.page_size;
        let mut buf = vec![0u8; WAL_READ];
        let mut i = 0;
        while i < pages.len() {
            let Loc::Data(off) = pages[i].1 else {
                sink.tombstone(pages[i].0)?;
                sink.cut(false).await?;
                i += 1;
                continue;
            };
            let mut n = 1;
            while i + n < pages.len()
                && (n + 1) * ps <= WAL_READ
                && pages[i + n].1 == Loc::Data(off + (n * ps) as u64)
            {
                n += 1;
            }
            fileio::read_exact_at(file, &mut buf[..n * ps], off)
                .await
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::Io,
                        format!("read write buffer of image {}", self.name),
                        e,
                    )
                })?;
            for (k, (page, _)) in pages[i..i + n].iter().enumerate() {
                sink.page(*page, &buf[k * ps..(k + 1) * ps])?;
                sink.cut(false).await?;
            }
            i += n;
        }
        Ok(())
    }

    pub(super) async fn wait_for_room(&self) -> Result<()> {
        loop {
            self.check_fenced("write to")?;
            let wal = self.wal()?;
            let (active, total) = wal.sizes();
            if active >= self.store.settings.checkpoint_bytes {
                // A generation is frozen as soon as it is full, whatever the checkpointer is
                // busy with: by the time it gets there, pages rewritten since need no upload.
                wal.rotate_at(self.store.settings.checkpoint_bytes)?;
                self.life.kick.notify_one();
            }
            if total <= self.store.settings.max_buffered_bytes {
                return Ok(());
            }
            let wait = self.life.progress.notified();
            self.life.kick.notify_one();
            if self.life.closed.load(Ordering::Acquire) {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    format!("image {} is closing", self.name),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }
}
